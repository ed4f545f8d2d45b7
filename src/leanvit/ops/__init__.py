"""Pure tensor functions (graphs, scores, merging, schedules, fused scores): no model, no patching."""
