"""Measuring what a model costs: MACs per image and wall-clock throughput / latency."""
from .machine import machine_info, machine_summary
from .macs import MacsReport, count_macs, default_input_size
from .throughput import ThroughputReport, compare_throughput, measure_latency, measure_throughput

__all__ = ["MacsReport", "ThroughputReport", "compare_throughput", "count_macs", "default_input_size", "machine_info",
           "machine_summary", "measure_latency", "measure_throughput"]
