"""The living transformer: a small GPT whose synapses tire, remember and reproduce.

Importing the room loads no torch; :class:`SynapticGPT` loads it when first asked for.
"""

from birdbone.synapse.config import SynapticConfig, TrainConfig

__all__ = ["SynapticConfig", "SynapticGPT", "TrainConfig"]


def __getattr__(name: str):
    if name == "SynapticGPT":
        from birdbone.synapse.model import SynapticGPT

        return SynapticGPT
    raise AttributeError(name)
