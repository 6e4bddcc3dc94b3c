"""Rows for query tests, inserted through the same store functions the tuner uses."""

from dittune import db as D

GiB = 2**30
H100 = D.GpuKey("NVIDIA H100 80GB HBM3", 80 * GiB, "580.65", "9.0", 1)
L40 = D.GpuKey("NVIDIA L40S", 48 * GiB, "580.65", "8.9", 1)
FLUX = D.WorkloadKey("flux-dev", 1024, 1024, 28, 3.5)
VERSIONS = {"dittune": "0.1.0", "torch": "2.11.0", "triton": "3.6.0", "driver": "580.65"}


def add_study(database, name="s1", gpu=H100, workload=FLUX, registry="r1", versions=VERSIONS):
    return D.open_study(database, D.StudyKey(name, workload, gpu, 80 * GiB, registry, dict(versions)))


def add_trial(database, study_id, argv, latency, peak_gib, status="complete", **kw):
    """A trial as the tuner stores it now: its peak is NVML's whole footprint (manifest["evidence"]);
    pass manifest={} for a trial stored before that (a legacy torch-reserved peak)."""
    flags = kw.pop("flags", {})
    kw.setdefault("manifest", {"evidence": {"peak_kind": "nvml_process"}} if peak_gib is not None else {})
    return D.record_trial(database, study_id, D.TrialRecord(
        status=status, flags=flags, argv=argv, latency_s=latency,
        peak_vram_bytes=None if peak_gib is None else int(peak_gib * GiB), step_median_s=latency / 30 if latency else None,
        step_spread=0.01, **kw))
