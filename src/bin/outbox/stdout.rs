//! Standard output that fails cleanly. `println!` panics when a write fails
//! (a full disk, a closed pipe); every command writes through [`Stdout`]
//! instead, so that any such failure ends the command with the same one
//! line, `error: cannot write to standard output: …`, and exit code 1.

use std::io::{self, Write};

/// Standard output, locked; its errors are [`failed`]'s.
pub struct Stdout(io::StdoutLock<'static>);

/// Locks standard output for one command (or one event of the relay).
pub fn stdout() -> Stdout {
    Stdout(io::stdout().lock())
}

impl Write for Stdout {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.write(buf).map_err(failed)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.0.flush().map_err(failed)
    }
}

/// `error` as a failure to write to standard output: the one message every
/// command gives. Interruptions are left alone (`write_all` retries them).
pub fn failed(error: io::Error) -> io::Error {
    if error.kind() == io::ErrorKind::Interrupted {
        return error;
    }
    io::Error::new(
        error.kind(),
        format!("cannot write to standard output: {error}"),
    )
}
