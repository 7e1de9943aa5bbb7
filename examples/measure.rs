//! Runs a command and reports what it cost: wall time, CPU time (user + system, all threads),
//! peak RSS (the kernel's high-water mark, `wait4`'s `ru_maxrss`: it counts the resident pages
//! of memory-mapped inputs too) and the private peak (the largest `RssAnon` of
//! `/proc/PID/status`, sampled every `--every-ms` milliseconds: memory the process allocated,
//! without file pages, which the page cache shares and can reclaim). For the scale benchmark
//! (`scripts/bench-scale.sh`); Linux only.
//!
//! ```sh
//! measure [--every-ms 5] -- ggmerge quantize in.gguf out.gguf Q8_0
//! # prints: WALL_S USER_S SYS_S PEAK_RSS_KIB PRIVATE_PEAK_KIB
//! ```
//!
//! The command's output goes where this program's goes; the figures go to standard error, one
//! line, prefixed `measure:`, and to standard output when `--print` is given. The exit status
//! is the command's.

use std::process::{Command, ExitCode};
use std::time::{Duration, Instant};

/// The `RssAnon` of `/proc/PID/status`, in KiB.
fn rss_anon(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("RssAnon:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

fn main() -> ExitCode {
    let mut args = std::env::args().skip(1).peekable();
    let mut every = Duration::from_millis(5);
    let mut print = false;
    while let Some(a) = args.peek().cloned() {
        match a.as_str() {
            "--every-ms" => {
                args.next();
                match args.next().and_then(|v| v.parse().ok()) {
                    Some(ms) => every = Duration::from_millis(ms),
                    None => {
                        eprintln!("measure: --every-ms needs a number of milliseconds");
                        return ExitCode::from(2);
                    }
                }
            }
            "--print" => {
                args.next();
                print = true;
            }
            "--" => {
                args.next();
                break;
            }
            _ => break,
        }
    }
    let cmd: Vec<String> = args.collect();
    let Some((program, rest)) = cmd.split_first() else {
        eprintln!("usage: measure [--every-ms N] [--print] -- COMMAND [ARGS...]");
        return ExitCode::from(2);
    };
    let started = Instant::now();
    let child = match Command::new(program).args(rest).spawn() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("measure: cannot run {program}: {e}");
            return ExitCode::from(127);
        }
    };
    let pid = child.id();
    let mut anon_peak = 0u64;
    let mut status: libc::c_int = 0;
    // SAFETY: a zeroed rusage is a valid value for wait4 to fill.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    loop {
        // Sampled before the non-blocking wait, so the last sample is of a live process.
        if let Some(kib) = rss_anon(pid) {
            anon_peak = anon_peak.max(kib);
        }
        // SAFETY: `pid` is our child, not yet reaped; status and usage are valid for writes.
        let r = unsafe { libc::wait4(pid as libc::pid_t, &mut status, libc::WNOHANG, &mut usage) };
        if r == pid as libc::pid_t {
            break;
        }
        if r < 0 {
            eprintln!("measure: wait4 failed: {}", std::io::Error::last_os_error());
            return ExitCode::from(1);
        }
        std::thread::sleep(every);
    }
    let wall = started.elapsed().as_secs_f64();
    let secs = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    let line = format!(
        "{wall:.3} {:.3} {:.3} {} {anon_peak}",
        secs(usage.ru_utime),
        secs(usage.ru_stime),
        usage.ru_maxrss
    );
    eprintln!("measure: {line}");
    if print {
        println!("{line}");
    }
    if libc::WIFEXITED(status) {
        ExitCode::from(libc::WEXITSTATUS(status) as u8)
    } else {
        ExitCode::from(128 + libc::WTERMSIG(status) as u8)
    }
}
