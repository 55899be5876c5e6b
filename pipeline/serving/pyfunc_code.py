"""The code of the logged MLflow model (MLflow "models from code"): loading runs this file, never a pickle."""

from mlflow.models import set_model

from pipeline.serving.mlflow_model import NarvlPyfunc

set_model(NarvlPyfunc())
