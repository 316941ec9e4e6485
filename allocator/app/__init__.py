"""The application: CLI jobs, Hydra configs, reports, plots, sweep summaries. Imports every layer below; nothing imports it but benchmarks."""
