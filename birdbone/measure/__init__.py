"""Measure: a data-free map of a model, one pure function per metric.

``metrics`` live in :mod:`basic` (bits per weight, norm, zeros), :mod:`distribution` (histogram
entropy, kurtosis, scale coherence), :mod:`theta` (θ_v1), :mod:`spectrum` (singular values,
explained variance, ranks, α). :func:`measure_tensor` gathers them for one tensor,
:func:`measure_model` for a whole model (streamed, in parallel), :func:`fleet` compares models;
:mod:`report` writes JSON, CSV and an HTML report. Usage (needs text and torch):
:func:`profile` hooks every linear layer over calibration text (what llama.cpp's imatrix stores,
activation frequency, head contributions, optional gradients); :func:`write_profile` writes
``usage.safetensors``, ``usage.json`` and an importance matrix llama.cpp reads.
"""

from birdbone.measure.config import MeasureConfig, MeasureSkipped
from birdbone.measure.config import ProfileConfig
from birdbone.measure.map import Aggregate, FleetReport, FleetRow, ModelMap, aggregate, fleet, measure_model, measure_models
from birdbone.measure.profile import ProfileReport, profile, profile_model
from birdbone.measure.usage import UsageProfile, write_profile
from birdbone.measure.report import write_csv, write_fleet_csv, write_html, write_json
from birdbone.measure.tensor import TensorMeasures, measure_tensor
from birdbone.measure.theta import THETA_VERSION, theta_v1

__all__ = [
    "THETA_VERSION", "Aggregate", "FleetRow", "MeasureConfig", "MeasureSkipped", "ModelMap", "TensorMeasures", "UsageProfile",
    "aggregate", "fleet", "measure_model", "measure_models", "profile_model", "FleetReport", "ProfileReport", "ProfileConfig", "measure_tensor", "theta_v1", "write_csv", "write_fleet_csv",
    "write_html", "write_json", "profile", "write_profile",
]
