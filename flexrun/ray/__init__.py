"""Batch jobs on a Ray cluster: `FlexrunPredictor` for `ray.data.Dataset.map_batches` (one LLM
per actor, planned for the actor's share of its host) and `map_generate`, the same with an
actor pool set up. Ray itself is optional (`pip install -e '.[ray]'`): nothing here imports it
until an actor asks Ray about its resources."""
from flexrun.ray.predictor import FlexrunPredictor, GenerateConfig, map_generate
from flexrun.ray.share import HostShare, actors_per_host, shared_budgets, shared_profile

__all__ = ["FlexrunPredictor", "GenerateConfig", "HostShare", "actors_per_host",
           "map_generate", "shared_budgets", "shared_profile"]
