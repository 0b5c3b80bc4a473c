//! The local terminal, for `gractl ssh`'s interactive shells: raw mode
//! (keys, Ctrl-C included, go to the remote side as typed) restored when
//! the guard is dropped, and the window size; and echo off while a secret
//! is typed.
//!
//! These are the only calls into libc; each is a thin, checked wrapper.

use std::{io, mem::MaybeUninit, os::fd::RawFd};

const STDIN: RawFd = libc::STDIN_FILENO;
const STDOUT: RawFd = libc::STDOUT_FILENO;

/// Puts standard input's terminal into raw mode until dropped. Dropping
/// restores the settings it found, also when a command fails or panics.
pub struct RawMode {
    saved: libc::termios,
}

impl RawMode {
    pub fn enable() -> io::Result<RawMode> {
        let saved = get_attributes(STDIN)?;
        let mut raw = saved;
        make_raw(&mut raw);
        set_attributes(STDIN, &raw)?;
        Ok(RawMode { saved })
    }
}

impl Drop for RawMode {
    fn drop(&mut self) {
        // Nothing better to do if the terminal went away meanwhile.
        let _ = set_attributes(STDIN, &self.saved);
    }
}

/// Turns off echo on standard input's terminal until dropped, for typing a
/// secret; lines are still read whole.
pub struct NoEcho {
    saved: libc::termios,
}

impl NoEcho {
    pub fn enable() -> io::Result<NoEcho> {
        let saved = get_attributes(STDIN)?;
        let mut quiet = saved;
        quiet.c_lflag &= !libc::ECHO;
        quiet.c_lflag |= libc::ECHONL;
        set_attributes(STDIN, &quiet)?;
        Ok(NoEcho { saved })
    }
}

impl Drop for NoEcho {
    fn drop(&mut self) {
        let _ = set_attributes(STDIN, &self.saved);
    }
}

/// The window size as (columns, rows), from standard input's terminal or
/// else standard output's.
pub fn size() -> Option<(u32, u32)> {
    [STDIN, STDOUT].into_iter().find_map(window_size)
}

#[allow(unsafe_code)]
fn get_attributes(fd: RawFd) -> io::Result<libc::termios> {
    let mut termios = MaybeUninit::<libc::termios>::uninit();
    // SAFETY: tcgetattr writes a whole termios into the pointer on success,
    // and we only read it then.
    let result = unsafe { libc::tcgetattr(fd, termios.as_mut_ptr()) };
    if result == 0 {
        // SAFETY: initialised by the successful tcgetattr above.
        Ok(unsafe { termios.assume_init() })
    } else {
        Err(io::Error::last_os_error())
    }
}

#[allow(unsafe_code)]
fn set_attributes(fd: RawFd, termios: &libc::termios) -> io::Result<()> {
    // SAFETY: the pointer is to a valid termios that outlives the call.
    // TCSADRAIN lets output already written reach the screen first.
    let result = unsafe { libc::tcsetattr(fd, libc::TCSADRAIN, termios) };
    if result == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

#[allow(unsafe_code)]
fn make_raw(termios: &mut libc::termios) {
    // SAFETY: cfmakeraw only changes fields of the termios it is given.
    unsafe { libc::cfmakeraw(termios) };
}

#[allow(unsafe_code)]
fn window_size(fd: RawFd) -> Option<(u32, u32)> {
    let mut size = MaybeUninit::<libc::winsize>::zeroed();
    // SAFETY: TIOCGWINSZ writes one winsize into the pointer; a zeroed
    // winsize is valid even if the call fails.
    let result = unsafe { libc::ioctl(fd, libc::TIOCGWINSZ, size.as_mut_ptr()) };
    // SAFETY: zero-initialised above, and winsize is plain integers.
    let size = unsafe { size.assume_init() };
    (result == 0 && size.ws_col > 0 && size.ws_row > 0)
        .then(|| (u32::from(size.ws_col), u32::from(size.ws_row)))
}
