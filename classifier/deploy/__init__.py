"""A trained model outside training: Predictor, the torch-free OnnxPredictor, preprocessing as data, export and its
parity check."""
