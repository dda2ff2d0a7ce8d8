"""Measure: a data-free map of a model, one pure function per metric.

``metrics`` live in :mod:`basic` (bits per weight, norm, zeros), :mod:`distribution` (histogram
entropy, kurtosis, scale coherence), :mod:`theta` (θ_v1), :mod:`spectrum` (singular values,
explained variance, ranks, α). :func:`measure_tensor` gathers them for one tensor,
:func:`measure_model` for a whole model (streamed, in parallel), :func:`fleet` compares models;
:mod:`report` writes JSON, CSV and an HTML report.
"""

from birdbone.measure.config import MeasureConfig, MeasureSkipped
from birdbone.measure.map import Aggregate, FleetRow, ModelMap, aggregate, fleet, measure_model
from birdbone.measure.report import write_csv, write_fleet_csv, write_html, write_json
from birdbone.measure.tensor import TensorMeasures, measure_tensor
from birdbone.measure.theta import THETA_VERSION, theta_v1

__all__ = [
    "THETA_VERSION", "Aggregate", "FleetRow", "MeasureConfig", "MeasureSkipped", "ModelMap", "TensorMeasures",
    "aggregate", "fleet", "measure_model", "measure_tensor", "theta_v1", "write_csv", "write_fleet_csv",
    "write_html", "write_json",
]
