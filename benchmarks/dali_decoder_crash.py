"""DALI's CPU image decoder segfaults on a batch of 64 files when one early in the batch is not an
image (its header does not parse); an error is raised when that file is late in the batch, or when
fn.peek_image_shape parses the headers first. Run: python benchmarks/dali_decoder_crash.py [runs] (each case in a fresh process)."""
import os
import subprocess
import sys
import tempfile

import numpy as np

CASE = r"""
import sys
from nvidia.dali import fn, pipeline_def, types
files, guarded = sys.argv[1].split(","), sys.argv[2] == "1"
@pipeline_def(batch_size=len(files), num_threads=1, device_id=None, seed=0, prefetch_queue_depth=1)
def pipe():
    data, _ = fn.readers.file(files=files)
    if guarded:  # the decoder's input waits for the header check
        data = fn.reshape(data, shape=data.shape(dtype=types.INT64) + fn.peek_image_shape(data)[0] * 0)
    return fn.decoders.image(data, device="cpu", output_type=types.RGB)
p = pipe()
p.build()
try:
    p.run()
except RuntimeError:
    print("error raised")
"""


def main(runs: int) -> None:
    from PIL import Image

    folder = tempfile.mkdtemp()
    good, bad = os.path.join(folder, "good.jpg"), os.path.join(folder, "bad.jpg")
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(good)
    with open(bad, "wb") as f:  # random bytes, the size of the good file
        f.write(np.random.default_rng(1).integers(0, 256, os.path.getsize(good), dtype=np.uint8).tobytes())
    for where, guarded in (("first", "0"), ("last", "0"), ("first", "1")):
        files = [good] * 64
        files[0 if where == "first" else -1] = bad
        outcomes = []
        for _ in range(runs):
            r = subprocess.run([sys.executable, "-c", CASE, ",".join(files), guarded], capture_output=True, text=True)
            outcomes.append("SIGSEGV" if r.returncode == -11 else r.stdout.strip() or f"exit {r.returncode}")
        label = f"bad file {where} of 64, {'header check first' if guarded == '1' else 'decoder alone'}"
        print(f"{label}: " + ", ".join(f"{o} x{outcomes.count(o)}" for o in sorted(set(outcomes))))


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 10)
