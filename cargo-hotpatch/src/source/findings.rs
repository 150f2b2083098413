//! Step 5: the library's source of both sides, parsed and compared item
//! by item (module `syntax`): what a patch cannot carry (a type's layout,
//! a static, a patchable signature) is refused before any build.

use std::path::Path;

use super::checkout::Trees;
use super::workspace::Workspace;
use crate::syntax::CrateSource;
use crate::{BuildError, Refusal};

/// The two sides' parsed sources. `notes` gets the findings that do not
/// refuse (a changed `const`).
pub(super) fn check(
    ws: &Workspace,
    trees: &Trees,
    notes: &mut Vec<String>,
) -> Result<(CrateSource, CrateSource), BuildError> {
    // Parsed from the workspace root: every location names its file as
    // the workspace does (`services/api/src/lib.rs`).
    let parse = |root: &Path, side: &'static str| {
        crate::syntax::parse_crate(root, &root.join(&ws.lib_src))
            .map(|c| c.with_crate_name(&ws.lib_name))
            .map_err(|e| {
                BuildError::Refused(vec![Refusal::SourceDoesNotParse {
                    side,
                    error: e.to_string(),
                }])
            })
    };
    let base = parse(&trees.base, "base")?;
    let head = parse(&trees.head, "head")?;
    let mut refusals = Vec::new();
    for finding in crate::syntax::compare(&base, &head) {
        if finding.refuses() {
            refusals.push(Refusal::Source { finding });
        } else {
            notes.push(finding.to_string());
        }
    }
    if !refusals.is_empty() {
        return Err(BuildError::Refused(refusals));
    }
    Ok((base, head))
}
