-- Run once by the postgres image on an empty volume: MLflow's auth app keeps users and permissions in a database of
-- its own (its migrations must not share the tracking database's alembic table).
CREATE DATABASE mlflow_auth;
