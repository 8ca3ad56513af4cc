"""NIfTI in and out: validate, reorient to the working orientation, map masks back."""

from bmltrt.io.nifti import (  # noqa: F401
    WORKING_AXCODES,
    Scan,
    load_scan,
    read_header_checked,
    save_mask_like,
    write_nifti_atomic,
)
