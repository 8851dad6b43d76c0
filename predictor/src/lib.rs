//! Resource predictor: telemetry windows, forecasters, policy and evaluation.
