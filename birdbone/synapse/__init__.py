"""The living transformer: a small GPT whose synapses tire, remember and (later) reproduce."""

from birdbone.synapse.model import SynapticConfig, SynapticGPT

__all__ = ["SynapticConfig", "SynapticGPT"]
