"""The vLLM side of check_vllm.py, run by the vLLM environment's Python (not this project's: vLLM pins another
transformers): `python vllm_worker.py request.json result.json`.

request: {"model": dir, "prompts": [[token ids], ...], "max_tokens": n, "dtype": "float32", "max_model_len": n,
          "skip_tokenizer_init": false}
result:  {"vllm": version, "transformers": version, "seconds": {...},
          "completions": [{"tokens": [...], "logprobs": [top-1 log-prob of each generated token], "text": str}]}
Greedy, EOS ignored, prompts given as token ids: both sides see the same input and produce the same count."""

import json
import sys
import time


def main() -> None:
    with open(sys.argv[1]) as f:
        request = json.load(f)
    start = time.monotonic()
    import transformers
    import vllm
    from vllm import LLM, SamplingParams

    llm = LLM(
        model=request["model"],
        trust_remote_code=True,  # the export's configuration_decilm.py gives block_configs as attributes
        dtype=request["dtype"],
        max_model_len=request["max_model_len"],
        seed=0,
        # A model whose tokenizer is not a Hugging Face one (the tests' byte tokenizer): prompts are token ids anyway.
        skip_tokenizer_init=request.get("skip_tokenizer_init", False),
    )
    loaded = time.monotonic()
    params = SamplingParams(temperature=0.0, max_tokens=request["max_tokens"], ignore_eos=True, logprobs=1)
    outputs = llm.generate([{"prompt_token_ids": ids} for ids in request["prompts"]], params)
    completions = []
    for output in outputs:
        done = output.outputs[0]
        tokens = list(done.token_ids)
        completions.append({
            "tokens": tokens,
            "logprobs": [float(step[token].logprob) for step, token in zip(done.logprobs, tokens)],
            "text": done.text,
        })
    result = {
        "vllm": vllm.__version__,
        "transformers": transformers.__version__,
        "seconds": {"load": loaded - start, "generate": time.monotonic() - loaded},
        "completions": completions,
    }
    with open(sys.argv[2], "w") as f:
        json.dump(result, f, indent=1)


if __name__ == "__main__":  # vLLM starts its engine in a subprocess that re-imports this file
    main()
