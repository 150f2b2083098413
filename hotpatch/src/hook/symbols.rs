//! The functions of this executable, from its `.symtab` (local functions
//! included, which the dynamic symbol table lacks), at their run-time
//! addresses.

use std::sync::OnceLock;

use object::{Object, ObjectSymbol, SymbolKind};

#[derive(Debug)]
pub(crate) struct Function {
    pub addr: usize,
    pub len: usize,
    /// As in the symbol table (mangled).
    pub symbol: String,
}

/// The load bias of the executable: the first object `dl_iterate_phdr`
/// reports.
fn bias() -> usize {
    unsafe extern "C" fn first(
        info: *mut libc::dl_phdr_info,
        _size: usize,
        data: *mut libc::c_void,
    ) -> libc::c_int {
        // SAFETY: `info` is valid during the callback and `data` is the
        // `usize` passed below.
        unsafe { *data.cast::<usize>() = (*info).dlpi_addr as usize };
        1
    }
    let mut bias = 0usize;
    // SAFETY: the callback writes only to `bias`, which outlives the call.
    unsafe { libc::dl_iterate_phdr(Some(first), (&raw mut bias).cast()) };
    bias
}

fn load() -> Result<Vec<Function>, String> {
    let path = "/proc/self/exe";
    let data = std::fs::read(path).map_err(|e| format!("cannot read {path}: {e}"))?;
    let file = object::File::parse(&*data).map_err(|e| format!("{path}: {e}"))?;
    let bias = bias();
    let mut out: Vec<Function> = file
        .symbols()
        .filter(|s| s.kind() == SymbolKind::Text && s.size() > 0 && s.is_definition())
        .filter_map(|s| {
            Some(Function {
                addr: (s.address() as usize).wrapping_add(bias),
                len: s.size() as usize,
                symbol: s.name().ok()?.to_owned(),
            })
        })
        .collect();
    if out.is_empty() {
        return Err(format!(
            "{path} has no symbol table (stripped?): build the service with its symbols"
        ));
    }
    out.sort_by_key(|f| f.addr);
    Ok(out)
}

pub(crate) fn functions() -> Result<&'static [Function], String> {
    static FUNCTIONS: OnceLock<Result<Vec<Function>, String>> = OnceLock::new();
    FUNCTIONS.get_or_init(load).as_deref().map_err(Clone::clone)
}

/// The function whose code contains `addr`.
pub(crate) fn containing(addr: usize) -> Result<Option<&'static Function>, String> {
    let all = functions()?;
    let i = all.partition_point(|f| f.addr <= addr);
    Ok(i.checked_sub(1)
        .map(|i| &all[i])
        .filter(|f| addr < f.addr + f.len))
}

/// The functions named `path`: the symbol itself, or its demangled name
/// without the hash (`my_service::db::Db::get`).
pub(crate) fn named(path: &str) -> Result<Vec<&'static Function>, String> {
    let mut found: Vec<&Function> = functions()?
        .iter()
        .filter(|f| {
            f.symbol == path || format!("{:#}", rustc_demangle::demangle(&f.symbol)) == path
        })
        .collect();
    found.dedup_by_key(|f| f.addr);
    Ok(found)
}

/// A readable name for `addr`'s function.
pub(crate) fn name_of(f: &Function) -> String {
    format!("{:#}", rustc_demangle::demangle(&f.symbol))
}
