"""``python tests/train_recording_rows.py RECORD ARGS...`` runs ``python train.py ARGS...``
unchanged and appends, for each array that this process feeds to the devices
(``jax.make_array_from_process_local_data``, a training batch's inputs, targets, ... in
turn), its shape and CRC-32 as one JSON line to ``RECORD.<process index>``: what each process
of a multi-process run really read."""

import json
import os
import runpy
import sys
import zlib

import jax
import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main() -> None:
    record, args = sys.argv[1], sys.argv[2:]
    make_array = jax.make_array_from_process_local_data

    def recording(sharding, local_data, *rest, **kwargs):
        data = np.ascontiguousarray(local_data)
        with open(f"{record}.{jax.process_index()}", "a") as f:
            f.write(json.dumps([list(data.shape), zlib.crc32(data.tobytes())]) + "\n")
        return make_array(sharding, local_data, *rest, **kwargs)

    jax.make_array_from_process_local_data = recording
    sys.argv = [os.path.join(ROOT, "train.py"), *args]
    sys.path.insert(0, ROOT)
    runpy.run_path(sys.argv[0], run_name="__main__")


if __name__ == "__main__":
    main()
