"""The published LN3Diff models (Hugging Face `yslan/LN3Diff`), rebuilt from the official architecture.

Module attribute names follow the official state_dict keys, so a released checkpoint maps onto
these modules one to one after its prefix (`ddpm_model.`, `rec_model.decoder.`) is stripped. The
conventions and parity fixtures are described in `../shared/official-ln3diff/README.md`; no
official code is copied here (it is under the non-commercial S-Lab License 1.0).
"""
