"""histodetect: find metastatic cancer in histopathology patches.

The library is organised around two artefacts: the *store* (``histodetect.data.store``), a packed,
memory-mappable copy of the patches written by ``ingest``; and the *run* (``histodetect.train.run``), the folder
``train`` writes. Every command reads one of them and writes a file or the other.
"""

__version__ = "0.1.0"
