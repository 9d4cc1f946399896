//! VAE parity (`vae` mode and the decode part of `t2i` dumps). Not implemented yet.

use anyhow::Result;

use super::{ParityArgs, Reference, Report};

pub fn check(_args: &ParityArgs, _reference: &Reference, report: &mut Report) -> Result<()> {
    report.skip("vae", "VAE not implemented yet");
    Ok(())
}

/// The decode part of a t2i dump (`vae.decode.0.*`, `image_uint8`).
pub fn check_t2i_part(
    _args: &ParityArgs,
    _reference: &Reference,
    report: &mut Report,
) -> Result<()> {
    report.skip("t2i decode", "VAE not implemented yet");
    Ok(())
}
