//! Kernel-level GPU profile of a stretch of work: every kernel, copy and memset the device ran,
//! with its time on the GPU, grouped by name. Through NVIDIA's CUPTI activity API, loaded at
//! run time from `libcupti.so.13` (PyTorch's CUDA 13 wheels ship it, in `nvidia/cu13/lib`), so
//! no build links it and a machine without it only loses the profile.
//!
//! ```no_run
//! # fn main() -> klspeech::Result<()> {
//! # let dev = candle_core::Device::Cpu;
//! let p = klspeech::gpu_profile::Profiler::start()?;
//! // ... GPU work ...
//! let profile = p.stop(&dev)?;
//! eprintln!("{}", profile.table(30));
//! # Ok(()) }
//! ```
//!
//! One profiler at a time per process (CUPTI's buffers are process-wide). The records are read
//! at the offsets CUPTI 13 gives them (`CUpti_ActivityKernel10`, `CUpti_ActivityMemcpy6`,
//! `CUpti_ActivityMemset4`); the fields used (start, end, name, bytes, copy kind) sit at the
//! same offsets in every record version since CUDA 11.

use std::collections::HashMap;
use std::ffi::{c_char, c_void, CStr};
use std::sync::{Mutex, OnceLock};

use candle_core::Device;

use crate::error::{Error, Result};

/// What one row of a profile counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Activity {
    Kernel,
    /// Host to device, device to host, device to device, or another direction.
    Copy(CopyKind),
    Memset,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CopyKind {
    HostToDevice,
    DeviceToHost,
    DeviceToDevice,
    Other,
}

/// One name's totals.
#[derive(Debug, Clone)]
pub struct Entry {
    pub activity: Activity,
    /// The kernel's (mangled) name, or the copy direction / "memset".
    pub name: String,
    pub calls: u64,
    /// Summed GPU time, nanoseconds.
    pub total_ns: u64,
    /// Bytes moved (copies and memsets; 0 for kernels).
    pub bytes: u64,
}

/// The activity recorded between [`Profiler::start`] and [`Profiler::stop`], longest first.
#[derive(Debug, Clone, Default)]
pub struct Profile {
    pub entries: Vec<Entry>,
    /// Records CUPTI dropped for want of buffer space (0 in a complete profile).
    pub dropped: u64,
}

impl Profile {
    /// Summed GPU time of every entry, nanoseconds (kernels that overlap count twice).
    pub fn total_ns(&self) -> u64 {
        self.entries.iter().map(|e| e.total_ns).sum()
    }

    /// A Markdown table of the `top` longest entries and one line for the rest.
    pub fn table(&self, top: usize) -> String {
        let total = self.total_ns().max(1) as f64;
        let mut s = String::from("| GPU time ms | share | calls | µs / call | what |\n|---|---|---|---|---|\n");
        for e in self.entries.iter().take(top) {
            let what = match e.activity {
                Activity::Kernel => short_name(&e.name),
                _ => format!("{} ({:.1} MB)", e.name, e.bytes as f64 / 1e6),
            };
            s += &format!(
                "| {:.2} | {:.1} % | {} | {:.1} | {} |\n",
                e.total_ns as f64 / 1e6,
                100.0 * e.total_ns as f64 / total,
                e.calls,
                e.total_ns as f64 / 1e3 / e.calls.max(1) as f64,
                what
            );
        }
        if self.entries.len() > top {
            let rest: u64 = self.entries[top..].iter().map(|e| e.total_ns).sum();
            let calls: u64 = self.entries[top..].iter().map(|e| e.calls).sum();
            s += &format!("| {:.2} | {:.1} % | {calls} | | {} others |\n", rest as f64 / 1e6, 100.0 * rest as f64 / total, self.entries.len() - top);
        }
        s += &format!("| {:.2} | 100 % | {} | | total{} |\n", total / 1e6, self.entries.iter().map(|e| e.calls).sum::<u64>(), if self.dropped > 0 { format!(", {} records dropped", self.dropped) } else { String::new() });
        s
    }
}

/// A kernel name for a table: C++ templates and argument lists cut to 100 characters.
fn short_name(name: &str) -> String {
    if name.chars().count() <= 100 {
        name.to_string()
    } else {
        format!("{}…", name.chars().take(99).collect::<String>())
    }
}

/// A running profile; [`Profiler::stop`] ends it.
#[derive(Debug)]
pub struct Profiler {
    api: &'static Api,
}

impl Profiler {
    /// Loads CUPTI (once) and starts recording kernels, copies and memsets on every GPU of the
    /// process. Fails with the reason where CUPTI is missing or refuses (no driver, another
    /// profiler such as Nsight attached, a profile already running).
    pub fn start() -> Result<Self> {
        let api = api()?;
        {
            let mut st = state().map_err(|_| unsupported("the profiler state is poisoned"))?;
            if st.running {
                return Err(unsupported("a GPU profile is already running in this process"));
            }
            st.stats.clear();
            st.dropped = 0;
            st.running = true;
        }
        // (The lock is not held across CUPTI calls: CUPTI may deliver buffers from inside them.)
        // SAFETY: the callbacks match CUPTI's C signatures; kinds are CUPTI_ACTIVITY_KIND_*.
        unsafe {
            let started = check((api.register_callbacks)(buffer_requested, buffer_completed), "cuptiActivityRegisterCallbacks").and_then(|_| {
                [KIND_CONCURRENT_KERNEL, KIND_MEMCPY, KIND_MEMSET].into_iter().try_for_each(|kind| check((api.enable)(kind), "cuptiActivityEnable"))
            });
            if let Err(e) = started {
                if let Ok(mut st) = state() {
                    st.running = false;
                }
                return Err(e);
            }
        }
        Ok(Self { api })
    }

    /// Waits for `dev` to finish, flushes CUPTI's buffers and returns the profile.
    pub fn stop(self, dev: &Device) -> Result<Profile> {
        dev.synchronize()?;
        // SAFETY: plain CUPTI calls; the flag 1 (CUPTI_ACTIVITY_FLAG_FLUSH_FORCED) also
        // flushes buffers that are not full.
        unsafe {
            for kind in [KIND_CONCURRENT_KERNEL, KIND_MEMCPY, KIND_MEMSET] {
                (self.api.disable)(kind);
            }
            check((self.api.flush_all)(1), "cuptiActivityFlushAll")?;
        }
        let mut st = state().map_err(|_| unsupported("the profiler state is poisoned"))?;
        st.running = false;
        let mut entries: Vec<Entry> = st
            .stats
            .drain()
            .map(|((activity, name), (calls, total_ns, bytes))| Entry { activity, name, calls, total_ns, bytes })
            .collect();
        entries.sort_by(|a, b| b.total_ns.cmp(&a.total_ns).then_with(|| a.name.cmp(&b.name)));
        Ok(Profile { entries, dropped: st.dropped })
    }
}

const KIND_MEMCPY: u32 = 1;
const KIND_MEMSET: u32 = 2;
const KIND_CONCURRENT_KERNEL: u32 = 10;
/// CUPTI_ERROR_MAX_LIMIT_REACHED: the end of a buffer's records.
const ERROR_MAX_LIMIT_REACHED: i32 = 12;
const BUFFER_BYTES: usize = 8 << 20;
const BUFFER_ALIGN: usize = 8;

type RequestFn = extern "C" fn(*mut *mut u8, *mut usize, *mut usize);
type CompleteFn = extern "C" fn(*mut c_void, u32, *mut u8, usize, usize);

/// The CUPTI entry points used.
#[derive(Debug)]
struct Api {
    register_callbacks: unsafe extern "C" fn(RequestFn, CompleteFn) -> i32,
    enable: unsafe extern "C" fn(u32) -> i32,
    disable: unsafe extern "C" fn(u32) -> i32,
    flush_all: unsafe extern "C" fn(u32) -> i32,
    next_record: unsafe extern "C" fn(*mut u8, usize, *mut *mut u8) -> i32,
    result_string: unsafe extern "C" fn(i32, *mut *const c_char) -> i32,
    dropped: unsafe extern "C" fn(*mut c_void, u32, *mut usize) -> i32,
}

static API: OnceLock<std::result::Result<Api, String>> = OnceLock::new();

fn unsupported(detail: impl Into<String>) -> Error {
    Error::Unsupported { what: "GPU kernel profile".into(), detail: detail.into() }
}

fn api() -> Result<&'static Api> {
    API.get_or_init(load).as_ref().map_err(|e| unsupported(e.clone()))
}

fn load() -> std::result::Result<Api, String> {
    let mut handle = std::ptr::null_mut();
    for lib in [c"libcupti.so.13", c"libcupti.so"] {
        // SAFETY: dlopen with a valid C string; the library stays loaded for the process.
        handle = unsafe { libc::dlopen(lib.as_ptr(), libc::RTLD_NOW | libc::RTLD_LOCAL) };
        if !handle.is_null() {
            break;
        }
    }
    if handle.is_null() {
        return Err("libcupti.so.13 not found: add PyTorch's nvidia/cu13/lib (or the CUDA toolkit's extras/CUPTI/lib64) to LD_LIBRARY_PATH".into());
    }
    let sym = |name: &CStr| -> std::result::Result<*mut c_void, String> {
        // SAFETY: dlsym on a live handle with a valid C string.
        let p = unsafe { libc::dlsym(handle, name.as_ptr()) };
        if p.is_null() {
            Err(format!("libcupti has no {}", name.to_string_lossy()))
        } else {
            Ok(p)
        }
    };
    // SAFETY: each symbol has the C signature declared in cupti_activity.h / cupti_result.h.
    unsafe {
        Ok(Api {
            register_callbacks: std::mem::transmute::<*mut c_void, unsafe extern "C" fn(RequestFn, CompleteFn) -> i32>(sym(c"cuptiActivityRegisterCallbacks")?),
            enable: std::mem::transmute::<*mut c_void, unsafe extern "C" fn(u32) -> i32>(sym(c"cuptiActivityEnable")?),
            disable: std::mem::transmute::<*mut c_void, unsafe extern "C" fn(u32) -> i32>(sym(c"cuptiActivityDisable")?),
            flush_all: std::mem::transmute::<*mut c_void, unsafe extern "C" fn(u32) -> i32>(sym(c"cuptiActivityFlushAll")?),
            next_record: std::mem::transmute::<*mut c_void, unsafe extern "C" fn(*mut u8, usize, *mut *mut u8) -> i32>(sym(c"cuptiActivityGetNextRecord")?),
            result_string: std::mem::transmute::<*mut c_void, unsafe extern "C" fn(i32, *mut *const c_char) -> i32>(sym(c"cuptiGetResultString")?),
            dropped: std::mem::transmute::<*mut c_void, unsafe extern "C" fn(*mut c_void, u32, *mut usize) -> i32>(sym(c"cuptiActivityGetNumDroppedRecords")?),
        })
    }
}

fn check(code: i32, what: &str) -> Result<()> {
    if code == 0 {
        return Ok(());
    }
    let mut msg: *const c_char = std::ptr::null();
    if let Ok(api) = api() {
        // SAFETY: CUPTI returns a static string for any code.
        unsafe { (api.result_string)(code, &mut msg) };
    }
    let text = if msg.is_null() { String::new() } else { unsafe { CStr::from_ptr(msg) }.to_string_lossy().into_owned() };
    Err(unsupported(format!("{what} failed: CUPTI error {code} {text}")))
}

/// Per (activity, name): calls, summed ns, summed bytes.
#[derive(Default)]
struct State {
    running: bool,
    stats: HashMap<(Activity, String), (u64, u64, u64)>,
    dropped: u64,
}

static STATE: OnceLock<Mutex<State>> = OnceLock::new();

fn state() -> std::sync::LockResult<std::sync::MutexGuard<'static, State>> {
    STATE.get_or_init(Default::default).lock()
}

fn buffer_layout() -> std::alloc::Layout {
    std::alloc::Layout::from_size_align(BUFFER_BYTES, BUFFER_ALIGN).expect("valid layout")
}

extern "C" fn buffer_requested(buffer: *mut *mut u8, size: *mut usize, max_records: *mut usize) {
    // SAFETY: CUPTI passes valid out-pointers; the buffer goes back in buffer_completed.
    unsafe {
        let p = std::alloc::alloc(buffer_layout());
        *buffer = p;
        *size = if p.is_null() { 0 } else { BUFFER_BYTES };
        *max_records = 0;
    }
}

/// Reads `u64` / `u32` / `u8` fields of a record at byte offsets (records are 8-byte aligned).
unsafe fn field<T: Copy>(rec: *const u8, offset: usize) -> T {
    std::ptr::read_unaligned(rec.add(offset) as *const T)
}

extern "C" fn buffer_completed(ctx: *mut c_void, stream: u32, buffer: *mut u8, _size: usize, valid: usize) {
    if buffer.is_null() {
        return;
    }
    if let (Ok(api), Ok(mut st)) = (api(), state()) {
        let mut rec: *mut u8 = std::ptr::null_mut();
        loop {
            // SAFETY: walks the records CUPTI wrote into this buffer.
            let code = unsafe { (api.next_record)(buffer, valid, &mut rec) };
            if code != 0 || rec.is_null() {
                debug_assert!(code == ERROR_MAX_LIMIT_REACHED || code == 0);
                break;
            }
            // SAFETY: every record starts with its kind; the offsets are those of CUPTI 13's
            // record structs for that kind (see the module comment).
            unsafe {
                let kind: u32 = field(rec, 0);
                let (start, end): (u64, u64) = (field(rec, 16), field(rec, 24));
                let ns = end.saturating_sub(start);
                let (key, bytes) = match kind {
                    KIND_CONCURRENT_KERNEL => {
                        let name: *const c_char = field(rec, 104);
                        let name = if name.is_null() { "?".into() } else { CStr::from_ptr(name).to_string_lossy().into_owned() };
                        ((Activity::Kernel, name), 0)
                    }
                    KIND_MEMCPY => {
                        let ck = match field::<u8>(rec, 4) {
                            1 => CopyKind::HostToDevice,
                            2 => CopyKind::DeviceToHost,
                            8 => CopyKind::DeviceToDevice,
                            _ => CopyKind::Other,
                        };
                        ((Activity::Copy(ck), format!("copy {ck:?}")), field::<u64>(rec, 8))
                    }
                    KIND_MEMSET => ((Activity::Memset, "memset".to_string()), field::<u64>(rec, 8)),
                    _ => continue,
                };
                let e = st.stats.entry(key).or_default();
                e.0 += 1;
                e.1 += ns;
                e.2 += bytes;
            }
        }
        let mut dropped = 0usize;
        // SAFETY: plain query for this buffer's context and stream.
        if unsafe { (api.dropped)(ctx, stream, &mut dropped) } == 0 {
            st.dropped += dropped as u64;
        }
    }
    // SAFETY: allocated in buffer_requested with the same layout.
    unsafe { std::alloc::dealloc(buffer, buffer_layout()) };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_orders_shares_and_folds_the_tail() {
        let e = |name: &str, calls, ns| Entry { activity: Activity::Kernel, name: name.into(), calls, total_ns: ns, bytes: 0 };
        let p = Profile { entries: vec![e("sgemm", 10, 6_000_000), e("affine_f32", 100, 3_000_000), e("copy2d_f32", 4, 1_000_000)], dropped: 0 };
        let t = p.table(2);
        let lines: Vec<&str> = t.lines().collect();
        assert_eq!(lines[2], "| 6.00 | 60.0 % | 10 | 600.0 | sgemm |");
        assert_eq!(lines[3], "| 3.00 | 30.0 % | 100 | 30.0 | affine_f32 |");
        assert_eq!(lines[4], "| 1.00 | 10.0 % | 4 | | 1 others |");
        assert_eq!(lines[5], "| 10.00 | 100 % | 114 | | total |");
        assert_eq!(short_name(&"x".repeat(150)).chars().count(), 100);
    }

    /// Without libcupti (CI) or without a driver, starting fails with a reason instead of
    /// panicking; where it starts, a second start is refused and stop ends the profile. Either
    /// way nothing is left marked as running.
    #[test]
    fn start_fails_cleanly_or_profiles() {
        match Profiler::start() {
            Err(e) => {
                let msg = e.to_string();
                eprintln!("{msg}");
                assert!(msg.contains("GPU kernel profile"), "{msg}");
            }
            Ok(p) => {
                assert!(Profiler::start().unwrap_err().to_string().contains("already running"));
                p.stop(&Device::Cpu).unwrap();
            }
        }
        assert!(!state().unwrap().running);
    }
}
