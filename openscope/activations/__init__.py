"""Activations: harvest many sites in one forward into a sharded, resumable store, and read it back."""

from openscope.activations.batches import ActivationBatch
from openscope.activations.harvest import HarvestConfig, HarvestResult, harvest
from openscope.activations.store import ActivationStore, SiteStats

__all__ = ["ActivationBatch", "ActivationStore", "HarvestConfig", "HarvestResult", "SiteStats", "harvest"]
