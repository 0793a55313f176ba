//! The one place with `unsafe`: a minimal libpq connection (through
//! `pq-sys`, already linked by diesel) that LISTENs and blocks on its socket
//! until a notification arrives or a timeout passes.
//!
//! diesel's `notifications_iter()` only reads what has already arrived and
//! never blocks, and diesel does not expose its socket; the sync `postgres`
//! crate would bring tokio and ~67 crates. This is ~100 lines instead.
#![allow(unsafe_code)]

use std::ffi::{CStr, CString};
use std::ptr::NonNull;
use std::time::Duration;

use pq_sys::{
    ConnStatusType, ExecStatusType, PGconn, PQclear, PQconnectdb, PQconninfoFree, PQconninfoParse,
    PQconsumeInput, PQerrorMessage, PQexec, PQfinish, PQfreemem, PQnotifies, PQresultStatus,
    PQsetNoticeProcessor, PQsocket, PQstatus,
};

/// A dedicated libpq connection used only to LISTEN.
pub(crate) struct PqListener {
    conn: NonNull<PGconn>,
}

// SAFETY: libpq connections may move between threads; they must not be used
// from two threads at once, which `&mut self` on every method guarantees.
unsafe impl Send for PqListener {}

impl PqListener {
    /// Connects to `url` (a libpq connection string or URI).
    pub(crate) fn connect(url: &str) -> Result<Self, String> {
        let url =
            CString::new(url).map_err(|_| "the database URL contains a NUL byte".to_owned())?;
        // SAFETY: `url` is a valid NUL-terminated string that outlives the call.
        let raw = unsafe { PQconnectdb(url.as_ptr()) };
        let conn =
            NonNull::new(raw).ok_or_else(|| "libpq could not allocate a connection".to_owned())?;
        // From here on, Drop calls PQfinish, also on the error path.
        let listener = PqListener { conn };
        // SAFETY: `conn` is a live connection object owned by `listener`.
        if unsafe { PQstatus(listener.conn.as_ptr()) } != ConnStatusType::CONNECTION_OK {
            return Err(listener.error_message());
        }
        // SAFETY: live connection; the processor is a plain function that
        // ignores its (null) argument, valid for the program's lifetime.
        unsafe {
            PQsetNoticeProcessor(
                listener.conn.as_ptr(),
                Some(notice_to_tracing),
                std::ptr::null_mut(),
            )
        };
        Ok(listener)
    }

    /// Checks that `url` parses as a libpq connection string or URI,
    /// without connecting. Returns libpq's reason when it does not.
    pub(crate) fn check_url(url: &str) -> Result<(), String> {
        let url = CString::new(url).map_err(|_| "contains a NUL byte".to_owned())?;
        let mut error: *mut std::os::raw::c_char = std::ptr::null_mut();
        // SAFETY: `url` is NUL-terminated; `error` is a valid out-pointer.
        let options = unsafe { PQconninfoParse(url.as_ptr(), &mut error) };
        if !options.is_null() {
            // SAFETY: allocated by PQconninfoParse, freed once.
            unsafe { PQconninfoFree(options) };
            return Ok(());
        }
        if error.is_null() {
            return Err("libpq could not parse it (out of memory)".to_owned());
        }
        // SAFETY: libpq set `error` to a NUL-terminated message we must free.
        let message = unsafe { CStr::from_ptr(error) }
            .to_string_lossy()
            .trim()
            .to_owned();
        // SAFETY: allocated by libpq, freed once, not used after.
        unsafe { PQfreemem(error.cast()) };
        Err(message)
    }

    /// Runs a command that returns no rows (`LISTEN channel`, the wake-up
    /// flag's `UPDATE`).
    pub(crate) fn execute(&mut self, sql: &str) -> Result<(), String> {
        let sql = CString::new(sql).map_err(|_| "SQL contains a NUL byte".to_owned())?;
        // SAFETY: live connection; `sql` is NUL-terminated and outlives the call.
        let result = unsafe { PQexec(self.conn.as_ptr(), sql.as_ptr()) };
        if result.is_null() {
            return Err(self.error_message());
        }
        // SAFETY: `result` is a non-null result from PQexec, cleared exactly once below.
        let status = unsafe { PQresultStatus(result) };
        // SAFETY: as above; `result` is not used after this.
        unsafe { PQclear(result) };
        if status == ExecStatusType::PGRES_COMMAND_OK {
            Ok(())
        } else {
            Err(self.error_message())
        }
    }

    /// Blocks until at least one notification has arrived or `timeout`
    /// passed; returns how many arrived (0 on timeout). An error means the
    /// connection is gone.
    pub(crate) fn wait(&mut self, timeout: Duration) -> Result<usize, String> {
        let pending = self.drain()?;
        if pending > 0 {
            return Ok(pending);
        }
        // SAFETY: live connection.
        let fd = unsafe { PQsocket(self.conn.as_ptr()) };
        if fd < 0 {
            return Err("the listener connection has no socket".to_owned());
        }
        let mut pollfd = libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        };
        let millis = libc::c_int::try_from(timeout.as_millis()).unwrap_or(libc::c_int::MAX);
        // SAFETY: `pollfd` is one valid, initialised entry, as the count says.
        let ready = unsafe { libc::poll(&mut pollfd, 1, millis) };
        if ready < 0 {
            let error = std::io::Error::last_os_error();
            if error.kind() == std::io::ErrorKind::Interrupted {
                return Ok(0);
            }
            return Err(format!("waiting on the listener socket: {error}"));
        }
        if ready == 0 {
            return Ok(0);
        }
        // Readable (or hung up: then PQconsumeInput reports the error).
        self.drain()
    }

    /// Reads what the server sent and counts (and frees) the notifications.
    fn drain(&mut self) -> Result<usize, String> {
        // SAFETY: live connection.
        if unsafe { PQconsumeInput(self.conn.as_ptr()) } == 0 {
            return Err(self.error_message());
        }
        let mut count = 0;
        loop {
            // SAFETY: live connection; a non-null result is ours to free.
            let notification = unsafe { PQnotifies(self.conn.as_ptr()) };
            if notification.is_null() {
                break;
            }
            // SAFETY: allocated by libpq, freed exactly once, not used after.
            unsafe { PQfreemem(notification.cast()) };
            count += 1;
        }
        Ok(count)
    }

    /// libpq's message for the last failure, trimmed. libpq never includes
    /// the password in it.
    fn error_message(&self) -> String {
        // SAFETY: live connection; libpq returns a NUL-terminated string it
        // owns, which we copy before any further call.
        let message = unsafe { CStr::from_ptr(PQerrorMessage(self.conn.as_ptr())) };
        let message = message.to_string_lossy().trim().to_owned();
        if message.is_empty() {
            "the listener connection failed".to_owned()
        } else {
            message
        }
    }
}

/// Routes the server's notices on the listener connection (such as the
/// FATAL sent before `pg_terminate_backend` closes it) to `tracing` instead
/// of libpq's default, which prints them raw on stderr.
unsafe extern "C" fn notice_to_tracing(
    _: *mut std::os::raw::c_void,
    message: *const std::os::raw::c_char,
) {
    if message.is_null() {
        return;
    }
    // SAFETY: libpq passes a NUL-terminated message valid during the call.
    let message = unsafe { CStr::from_ptr(message) }.to_string_lossy();
    tracing::debug!(notice = %message.trim(), "listener connection notice");
}

impl Drop for PqListener {
    fn drop(&mut self) {
        // SAFETY: `conn` came from PQconnectdb and is finished exactly once.
        unsafe { PQfinish(self.conn.as_ptr()) };
    }
}

#[cfg(test)]
mod tests {
    use super::PqListener;

    #[test]
    fn urls_are_checked_without_connecting() {
        assert!(PqListener::check_url("postgres://user@localhost:5432/db").is_ok());
        assert!(PqListener::check_url("host=localhost dbname=db").is_ok());
        let error = PqListener::check_url("not a url").unwrap_err();
        assert!(error.contains("missing \"=\" after \"not\""), "{error}");
    }
}
