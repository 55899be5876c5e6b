"""Serving a trained model: the predictor core, the MLflow pyfunc packaging and the Ray Serve application."""
