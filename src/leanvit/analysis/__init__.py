"""Measuring a model: MACs per image, wall-clock throughput / latency, CKA to another model, calibration."""
from .calibration import CalibrationReport, calibration
from .cka import cka_matrix, linear_cka
from .machine import machine_info, machine_summary, threads_phrase
from .macs import MacsReport, count_macs, default_input_size
from .throughput import (ThroughputReport, break_even_batch, compare_throughput, measure_latency, measure_throughput,
                         runtime_of, sweep_throughput)

__all__ = ["CalibrationReport", "MacsReport", "ThroughputReport", "break_even_batch", "calibration", "cka_matrix",
           "compare_throughput", "count_macs", "default_input_size", "linear_cka", "machine_info", "machine_summary",
           "measure_latency", "measure_throughput", "runtime_of", "sweep_throughput", "threads_phrase"]
