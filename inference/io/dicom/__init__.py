"""DICOM series -> :class:`Volume`, or an error that names what is wrong and where.

Policy (what a caller, or a successor changing this file, may rely on):

* Files are named by their 0-based position in the upload ("file 3"). Messages never carry patient data or UIDs;
  series are named by SeriesNumber and :func:`hash_uid`.
* Files must be DICOM Part 10: 128-byte preamble, ``DICM``, file meta information with a TransferSyntaxUID.
* Two passes. Every header is parsed first, stopping before the pixel data, and every check and limit runs
  before any pixel is decoded. Then only the chosen series is decoded, one file at a time, into a preallocated
  volume. Deflated data sets are inflated once, with a bound, to check their size before pydicom reads them.
* Non-image objects are skipped: no Pixel Data, float pixel data, or a non-image SOP class (SR, KO, PR, RT
  structure set / plan / dose, SEG, registration, waveform, encapsulated document). An instance that has Rows
  and Columns but no Pixel Data is an error, not a skip: it is usually a truncated file.
* One series per read, grouped by SeriesInstanceUID; several need ``series_instance_uid``: the UID, or the 12-digit
  :func:`hash_uid` that messages name the series by (messages never carry the UID itself).
* Slices are sorted by ImagePositionPatient projected on the slice normal (ImageOrientationPatient row direction
  x column direction), ascending, never by file order or InstanceNumber. The affine's third column is the mean
  step between consecutive sorted slices, so it points along +normal and the affine is right-handed.
* Tolerances: ImageOrientationPatient components agree within 1e-3 across a series (each direction unit length
  and the two orthogonal within 1e-2); PixelSpacing agrees within 0.1%; each step along the normal agrees with
  the median step within 1% or 0.01 mm, whichever is larger; positions closer than 0.01 mm are duplicates; a
  gap of n usual steps (within n tolerances) is reported as n - 1 missing slices.
* Gantry tilt and sheared stacks are rejected (UnsupportedError), not resampled: a stack whose axis leaves the
  slice normal by more than 0.1 degree (and more than 0.02 mm over the whole stack) is refused. Within that
  tolerance the measured step, shear included, is kept exactly in the affine.
* One image: slice step SliceThickness, 1 mm when absent. Without ImagePositionPatient (projection X-ray) the
  origin is 0, and without ImageOrientationPatient the directions are identity: coordinates are then mm on the
  image plane, not patient positions. PixelSpacing is preferred; ImagerPixelSpacing (detector plane, not
  corrected for magnification) is used for projection images with a warning.
* Voxels are stored values x RescaleSlope + RescaleIntercept as float32 (per frame for enhanced multi-frame).
  MONOCHROME1 is inverted over the stored-value range (2**BitsStored values) so that larger means brighter, as
  in MONOCHROME2. Only monochrome images are read; colour is UnsupportedError. PresentationLUTShape is not
  applied on top: the DX IOD pairs INVERSE with MONOCHROME1 and IDENTITY with MONOCHROME2, so it restates the
  photometric interpretation (archives such as dcm4chee trust the latter too, as some DX objects get the shape
  wrong). VOI LUTs and window settings are for display and are not applied: models take the values after the
  modality rescale and set their own window (the X-ray model a per-image percentile window).
* Native pixel data must have exactly Rows x Columns x frames x BitsAllocated/8 bytes (plus the one pad byte
  DICOM requires for odd lengths); anything else is a length mismatch (InvalidInputError).
* A transfer syntax with no decoder here is UnsupportedError naming the syntax; a decode failure is
  InvalidInputError. Zeros are never returned in place of pixels.
* JPEG 2000 codestreams have their framing checked before decoding (SOC/SIZ, image size, marker segment and
  tile-part lengths, EOC, no marker codes inside the coded data), because openjpeg decodes a damaged codestream
  into wrong pixels without an error. Bit errors inside the coded data stay undetectable (no checksum).
* pydicom's own value validation is off (``reading_validation_mode = IGNORE``) for the whole process: its
  warnings quote the offending value, which may be a patient's name, date or UID, and they reach the log.


The package, along the two passes: :mod:`~inference.io.dicom.series` (the reader and its interface),
:mod:`~inference.io.dicom.headers` (pass 1), :mod:`~inference.io.dicom.pixel_format`,
:mod:`~inference.io.dicom.geometry`, :mod:`~inference.io.dicom.elements` (element access and text helpers),
:mod:`~inference.io.dicom.decode` (pass 2) and :mod:`~inference.io.dicom.jpeg2000` (codestream framing).
"""

from inference.io.dicom.elements import hash_uid
from inference.io.dicom.series import DicomSeriesReader, read_dicom_file, read_dicom_header, read_dicom_series

__all__ = ["DicomSeriesReader", "hash_uid", "read_dicom_file", "read_dicom_header", "read_dicom_series"]
