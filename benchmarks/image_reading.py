"""Does prediction read a file as the builder stored it? Bit-for-bit matches per record and file kind.

For every dataset record, tests/test_image_reading.py writes files a reading can get wrong (RGBA and
palette transparency, 16-bit grey, EXIF orientation 6, CMYK, grey among colour) in the record's real
on-disk format, prepares them with its builder and reads each with api.Model.read_images; a file
matches when the two arrays are equal bit for bit. Prints one row per record and kind (seconds, no
real data needed):

  python benchmarks/image_reading.py
"""

import os
import pathlib
import sys
import tempfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from tests import test_image_reading  # pylint: disable=wrong-import-position


def main() -> None:
  print('| record | kind | bit-for-bit matches |')
  print('|---|---|---|')
  total = [0, 0]
  for record in test_image_reading.FILES:
    with tempfile.TemporaryDirectory() as root:
      counts = test_image_reading.matches(record, pathlib.Path(root))
    for kind, (matched, files) in sorted(counts.items()):
      print(f'| {record} | {kind} | {matched} of {files} |')
      total = [total[0] + matched, total[1] + files]
  print(f'| all | all | {total[0]} of {total[1]} |')


if __name__ == '__main__':
  main()
