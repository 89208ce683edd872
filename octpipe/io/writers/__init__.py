"""Writers of the vendor formats octpipe reads, for phantom files and test fixtures.

One module per format, next to its reader in :mod:`octpipe.io`, building files from the
reader's own layout tables: :mod:`~octpipe.io.writers.heyex_vol` (Heidelberg ``.vol``),
:mod:`~octpipe.io.writers.dicom` (DICOM Ophthalmic Tomography) and
:mod:`~octpipe.io.writers.images` (a folder of PNG B-scans). ``octpipe phantom``
(:mod:`octpipe.testing.phantom_files`) writes its phantoms with them; NIfTI, which export
writes too, keeps its writer in :mod:`octpipe.io.nifti`.
"""
