"""How the stages run as one pipeline: the stage table both engines are built from, the checks made
before any job starts, atomic outputs, MLflow tracking, DVC bookkeeping and GPU slots."""
