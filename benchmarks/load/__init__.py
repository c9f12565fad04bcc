"""The benchmark harness behind `tiergate bench`.

workload: requests from a dataset with a stated mix (repeats, paraphrases,
out-of-scope, risk, tenants); simulator: the SIMULATED frontier LLM over HTTP;
servers: the processes a run starts on loopback; configs: the configurations
compared (policies); loadgen: client processes, open or closed loop, HDR
histograms; report: Markdown, JSON and plots; cli: the command.
"""
