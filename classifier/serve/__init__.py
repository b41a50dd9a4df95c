"""`classifier serve`: a checkpoint or an ONNX file behind a REST API, with micro-batching, upload limits,
Prometheus metrics and a try-it page. Torch is imported only to serve a checkpoint."""
