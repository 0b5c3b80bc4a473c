//! The names people give grad's things — runners, jobs, workers, datasets —
//! are DNS labels, so each is also valid in a pod name, a host name and a URL.

use crate::error::{Error, Result};

/// Checks that `name` is 1-`max` of a-z, 0-9 and '-', starting with a
/// letter and not ending with '-'; `what` names it in the error.
pub fn dns_label(what: &str, name: &str, max: usize) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() <= max
        && name.starts_with(|c: char| c.is_ascii_lowercase())
        && !name.ends_with('-')
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-');
    if ok {
        Ok(())
    } else {
        Err(Error::InvalidArgument(format!(
            "invalid {what} '{}': use 1-{max} lowercase letters, digits and '-', starting with \
             a letter and not ending with '-'",
            name.escape_debug()
        )))
    }
}
