"""Thresholds, INT8 and evaluation reports for an engine; imports the runtime, never the exporter or torch.

Each command is a module with a typed function behind a thin `main(argv)`:
    calibrate  calibrate(engine_dir, benign_dir, toxic_dir, target_fpr) -> CalibrationReport
    evaluate   evaluate(gate, benign_dir, toxic_dir, out) -> EvaluationReport       (`safeclip eval`)
    quantize   quantize(engine_dir, images_dir, method, holdout_fraction) -> QuantizeReport
    scan       scan(gate, dataset, out, ...) -> ScanSummary
"""
