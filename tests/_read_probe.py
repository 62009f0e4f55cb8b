"""`python -m tests._read_probe ARGS`: kdtrain's CLI, with every image file a FileSource reads appended to
`$KDTRAIN_TEST_READS.<rank>` (one path a line), so tests/test_stream.py can see which rank read what."""

import os

from kdtrain.data.sources import FileSource

_read = FileSource.read


def _recorded(self: FileSource, i: int):
    with open(f"{os.environ['KDTRAIN_TEST_READS']}.{os.environ.get('RANK', '0')}", "a") as f:
        f.write(f"{self.files[i]}\n")
    return _read(self, i)


FileSource.read = _recorded

if __name__ == "__main__":
    from kdtrain.cli import main

    main()
