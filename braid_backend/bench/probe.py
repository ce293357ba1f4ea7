"""braid-bench's probe (a worker spec with ``"kind": "probe"``): the GPU's facts and its device-to-device
copy bandwidth, the limit the "% of bandwidth limit" column compares against."""
from __future__ import annotations

import subprocess


def probe(spec: dict) -> dict:
    """GPU facts and the device-to-device copy bandwidth (bytes read + written per second)."""
    import torch

    info = {"type": "probe", "gpu_name": None, "driver": None, "cuda_runtime": torch.version.cuda,
            "capability": None, "sm_count": None, "total_mem_mib": None, "copy_bw_gbs": None,
            "copy_bw_samples_gbs": None}
    info["driver"] = nvidia_smi_driver()
    if not torch.cuda.is_available():
        return info
    props = torch.cuda.get_device_properties(0)
    info.update(gpu_name=props.name, capability=f"{props.major}.{props.minor}",
                sm_count=props.multi_processor_count, total_mem_mib=round(props.total_memory / 2**20))
    nbytes = int(spec.get("copy_bytes", 1 << 30))
    src = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    src.fill_(7)
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    torch.cuda.synchronize()
    iters, samples = 10, []
    for _ in range(7):
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(iters):
            dst.copy_(src)
        end.record()
        end.synchronize()
        ms = start.elapsed_time(end)
        samples.append(2 * nbytes * iters / (ms / 1e3) / 1e9)
    info["copy_bw_samples_gbs"] = [round(s, 1) for s in samples]
    # The limit is the best rate the device showed; the median is next to it in the samples.
    info["copy_bw_gbs"] = max(samples)
    del src, dst
    return info


def nvidia_smi_driver():
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20)
        if out.returncode == 0 and out.stdout.strip():
            return out.stdout.strip().splitlines()[0].strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return None
