//! Writing behind the computation: one thread writes an output's parts, in order, while the
//! caller's threads compute the next ones.
//!
//! [`write_behind`] runs `produce` on the calling thread with a [`Parts`] handle and a writer
//! thread beside it. Every part `produce` hands over goes through a short queue
//! ([`QUEUED_PARTS`]) to the writer thread, which writes it to a [`TensorSink`] (a
//! [`GgufWriter`](crate::format::gguf::GgufWriter) or a
//! [`SafetensorsWriter`](crate::format::safetensors::SafetensorsWriter)) and then
//!
//! - returns a computed buffer ([`Parts::send`]) to a pool, from which [`Parts::buffer`] hands
//!   it out again: an output reuses a few buffers' pages instead of faulting in fresh memory
//!   for every slab;
//! - releases bytes of a memory-mapped input written as they are ([`Parts::send_mapped`]) from
//!   the process's resident set, through the caller's `release` function, once written.
//!
//! So a streamed command holds at most the queue's parts, the part being computed and the
//! input pages of that part, whatever the model's size. Errors: the first error of either
//! side is returned; when the writer fails, the computing side's sends fail with
//! [`FormatError::WriterStopped`] and the writer's own error is the one reported. The sink is
//! left as it was after its last write (an unfinished output that its owner drops, deleting
//! the temporary file).
//!
//! The merge runs its own writer thread (in `merge::run`, a layer above), which also carries
//! the engine's measurements; `quantize` and `convert` use this one.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{sync_channel, SyncSender};
use std::sync::{Arc, Mutex};

use crate::format::error::{FormatError, Result};

/// Parts queued for the writer thread at most: computing runs that far ahead of writing (a
/// page-cache copy can lag behind a fast conversion) instead of blocking on every part.
pub const QUEUED_PARTS: usize = 8;

/// Where [`write_behind`] writes: tensor data in order, part by part.
pub trait TensorSink: Send {
    /// Appends part of the current tensor's data.
    fn write_part(&mut self, bytes: &[u8]) -> Result<()>;
    /// Closes the current tensor (checks its size, pads).
    fn end_tensor(&mut self) -> Result<()>;
}

impl TensorSink for crate::format::gguf::GgufWriter {
    fn write_part(&mut self, bytes: &[u8]) -> Result<()> {
        crate::format::gguf::GgufWriter::write_part(self, bytes)
    }
    fn end_tensor(&mut self) -> Result<()> {
        crate::format::gguf::GgufWriter::end_tensor(self)
    }
}

impl TensorSink for crate::format::safetensors::SafetensorsWriter {
    fn write_part(&mut self, bytes: &[u8]) -> Result<()> {
        crate::format::safetensors::SafetensorsWriter::write_part(self, bytes)
    }
    fn end_tensor(&mut self) -> Result<()> {
        crate::format::safetensors::SafetensorsWriter::end_tensor(self)
    }
}

/// A message to the writer thread.
enum Msg<'a> {
    /// A computed buffer, back to the pool once written.
    Owned(Vec<u8>),
    /// Input bytes written as they are, released once written.
    Mapped(&'a [u8]),
    /// The current tensor is complete.
    EndTensor,
}

/// Buffers handed back by the writer thread.
#[derive(Default)]
struct Pool {
    free: Mutex<Vec<Vec<u8>>>,
}

impl Pool {
    /// Buffers kept for reuse at most: enough for a full queue, the part being written and
    /// the one being computed.
    const KEEP: usize = QUEUED_PARTS + 2;

    fn take(&self, len: usize) -> Vec<u8> {
        let reused = self.free.lock().ok().and_then(|mut f| f.pop());
        let mut buf = reused.unwrap_or_default();
        buf.truncate(len);
        buf.resize(len, 0);
        buf
    }

    fn give(&self, buf: Vec<u8>) {
        if let Ok(mut free) = self.free.lock() {
            if free.len() < Self::KEEP {
                free.push(buf);
            }
        }
    }
}

/// The computing side's handle of [`write_behind`]: parts are sent in output order.
pub struct Parts<'a> {
    tx: SyncSender<Msg<'a>>,
    pool: Arc<Pool>,
    stopped: AtomicBool,
}

impl<'a> Parts<'a> {
    /// A buffer of `len` bytes with unspecified contents, to fill and [`send`](Self::send).
    pub fn buffer(&self, len: usize) -> Vec<u8> {
        self.pool.take(len)
    }

    /// Queues a computed part of the current tensor.
    pub fn send(&self, bytes: Vec<u8>) -> Result<()> {
        self.put(Msg::Owned(bytes))
    }

    /// Queues bytes of a memory-mapped input as a part of the current tensor; they are
    /// released from the resident set once written.
    pub fn send_mapped(&self, bytes: &'a [u8]) -> Result<()> {
        self.put(Msg::Mapped(bytes))
    }

    /// Closes the current tensor.
    pub fn end_tensor(&self) -> Result<()> {
        self.put(Msg::EndTensor)
    }

    fn put(&self, msg: Msg<'a>) -> Result<()> {
        self.tx.send(msg).map_err(|_| {
            self.stopped.store(true, Ordering::Relaxed);
            FormatError::WriterStopped
        })
    }
}

/// Runs `produce` with a writer thread that writes what it sends to `sink` (see the module
/// docs). `release` is called with the bytes of each [`Parts::send_mapped`] part once they are
/// written. Returns `produce`'s value once every part is written, or the first error.
pub fn write_behind<'a, S, T, E>(
    sink: &mut S,
    release: &(dyn Fn(&[u8]) + Sync),
    produce: impl FnOnce(&Parts<'a>) -> std::result::Result<T, E>,
) -> std::result::Result<T, E>
where
    S: TensorSink,
    E: From<FormatError>,
{
    let (tx, rx) = sync_channel::<Msg<'a>>(QUEUED_PARTS);
    let pool = Arc::new(Pool::default());
    let parts = Parts {
        tx,
        pool: pool.clone(),
        stopped: AtomicBool::new(false),
    };
    std::thread::scope(|scope| {
        let writing = scope.spawn(move || -> Result<()> {
            for msg in rx {
                match msg {
                    Msg::Owned(buf) => {
                        sink.write_part(&buf)?;
                        pool.give(buf);
                    }
                    Msg::Mapped(bytes) => {
                        sink.write_part(bytes)?;
                        release(bytes);
                    }
                    Msg::EndTensor => sink.end_tensor()?,
                }
            }
            Ok(())
        });
        let produced = produce(&parts);
        let stopped = parts.stopped.load(Ordering::Relaxed);
        // Closes the queue: the writer ends once it has written what is queued.
        drop(parts);
        let written = match writing.join() {
            Ok(w) => w,
            Err(panic) => std::panic::resume_unwind(panic),
        };
        match (produced, written) {
            (Ok(t), Ok(())) => Ok(t),
            (Ok(_), Err(w)) => Err(w.into()),
            // The writer's error explains why the sends stopped.
            (Err(_), Err(w)) if stopped => Err(w.into()),
            (Err(e), _) => Err(e),
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A sink that records parts, failing at part `fail_at` if set.
    #[derive(Default)]
    struct Recorder {
        bytes: Vec<u8>,
        tensors: usize,
        parts: usize,
        fail_at: Option<usize>,
    }

    impl TensorSink for Recorder {
        fn write_part(&mut self, bytes: &[u8]) -> Result<()> {
            if Some(self.parts) == self.fail_at {
                return Err(FormatError::Write {
                    path: "out".into(),
                    reason: "disk full".into(),
                });
            }
            self.parts += 1;
            self.bytes.extend_from_slice(bytes);
            Ok(())
        }
        fn end_tensor(&mut self) -> Result<()> {
            self.tensors += 1;
            Ok(())
        }
    }

    #[test]
    fn parts_are_written_in_order_and_mapped_ones_released() {
        let input: Vec<u8> = (0..=255).collect();
        let released = Mutex::new(Vec::new());
        let release = |b: &[u8]| released.lock().unwrap().push(b.len());
        let mut sink = Recorder::default();
        let n = write_behind(&mut sink, &release, |parts| -> Result<usize> {
            for i in 0..100u8 {
                let mut b = parts.buffer(3);
                b.copy_from_slice(&[i, i, i]);
                parts.send(b)?;
                parts.send_mapped(&input[..i as usize])?;
                parts.end_tensor()?;
            }
            Ok(100)
        })
        .unwrap();
        assert_eq!(n, 100);
        assert_eq!(sink.tensors, 100);
        let mut expected = Vec::new();
        for i in 0..100u8 {
            expected.extend_from_slice(&[i, i, i]);
            expected.extend_from_slice(&input[..i as usize]);
        }
        assert_eq!(sink.bytes, expected);
        let released = released.into_inner().unwrap();
        assert_eq!(released, (0..100).collect::<Vec<usize>>());
    }

    #[test]
    fn the_writers_error_wins_over_the_stopped_sends() {
        let mut sink = Recorder {
            fail_at: Some(5),
            ..Default::default()
        };
        let err = write_behind(&mut sink, &|_| {}, |parts| -> Result<()> {
            for _ in 0..1000 {
                parts.send(parts.buffer(16))?;
            }
            Ok(())
        })
        .unwrap_err();
        assert!(err.to_string().contains("disk full"), "{err}");
        let err = write_behind(&mut Recorder::default(), &|_| {}, |parts| -> Result<()> {
            parts.send(parts.buffer(16))?;
            Err(FormatError::Write {
                path: "in".into(),
                reason: "bad tensor".into(),
            })
        })
        .unwrap_err();
        assert!(err.to_string().contains("bad tensor"), "{err}");
    }
}
