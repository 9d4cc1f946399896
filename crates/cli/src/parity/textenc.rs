//! Text-encoder parity (`textenc` mode and the text-encoder part of `t2i` dumps). Not implemented yet.

use anyhow::Result;

use super::{ParityArgs, Reference, Report};

pub fn check(_args: &ParityArgs, _reference: &Reference, report: &mut Report) -> Result<()> {
    report.skip("textenc", "text encoder not implemented yet");
    Ok(())
}

/// The text-encoder tensors of a t2i dump (`te.K.*`, `prompt_embeds`, masks).
pub fn check_t2i_part(
    _args: &ParityArgs,
    _reference: &Reference,
    report: &mut Report,
) -> Result<()> {
    report.skip("t2i text encoder", "text encoder not implemented yet");
    Ok(())
}
