"""The configuration and modeling code a `decilm` export ships (copied into the checkpoint, named in its
`auto_map`), so `AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)` builds it with plain
transformers and vLLM reads its `block_configs` as attributes. The files import only transformers and torch:
they run outside this project, and vLLM's environment pins an older transformers (the configuration works with
both; the modeling code is only transformers', vLLM has its own)."""

REMOTE_CODE_FILES = ("configuration_decilm.py", "modeling_decilm.py")
