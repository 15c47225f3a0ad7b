//! The UART in a snapshot: its registers and receive FIFO (vm-superio's `SerialState`, in a
//! form serde can write).

use serde::{Deserialize, Serialize};
use vm_superio::serial::{NoEvents, SerialState};
use vm_superio::Serial;

use super::{ConsoleOut, SerialDevice};
use crate::devices::legacy::EventFdTrigger;
use crate::persist::Persist;

/// The UART's receive FIFO holds this many bytes (vm-superio's FIFO_SIZE).
pub const FIFO_SIZE: usize = 64;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SerialSnapshot {
    pub baud_divisor_low: u8,
    pub baud_divisor_high: u8,
    pub interrupt_enable: u8,
    pub interrupt_identification: u8,
    pub line_control: u8,
    pub line_status: u8,
    pub modem_control: u8,
    pub modem_status: u8,
    pub scratch: u8,
    pub in_buffer: Vec<u8>,
}

#[derive(Debug, thiserror::Error)]
pub enum SerialRestoreError {
    #[error("the serial port holds {0} received bytes, its FIFO {FIFO_SIZE}")]
    Fifo(usize),
    #[error("vm-superio refused the serial port's state: {0}")]
    State(String),
}

impl SerialSnapshot {
    /// What can be checked before anything is built.
    pub fn check(&self) -> Result<(), SerialRestoreError> {
        if self.in_buffer.len() > FIFO_SIZE {
            return Err(SerialRestoreError::Fifo(self.in_buffer.len()));
        }
        Ok(())
    }
}

impl From<SerialState> for SerialSnapshot {
    fn from(s: SerialState) -> Self {
        Self {
            baud_divisor_low: s.baud_divisor_low,
            baud_divisor_high: s.baud_divisor_high,
            interrupt_enable: s.interrupt_enable,
            interrupt_identification: s.interrupt_identification,
            line_control: s.line_control,
            line_status: s.line_status,
            modem_control: s.modem_control,
            modem_status: s.modem_status,
            scratch: s.scratch,
            in_buffer: s.in_buffer,
        }
    }
}

impl From<&SerialSnapshot> for SerialState {
    fn from(s: &SerialSnapshot) -> Self {
        Self {
            baud_divisor_low: s.baud_divisor_low,
            baud_divisor_high: s.baud_divisor_high,
            interrupt_enable: s.interrupt_enable,
            interrupt_identification: s.interrupt_identification,
            line_control: s.line_control,
            line_status: s.line_status,
            modem_control: s.modem_control,
            modem_status: s.modem_status,
            scratch: s.scratch,
            in_buffer: s.in_buffer.clone(),
        }
    }
}

impl Persist for SerialDevice {
    type State = SerialSnapshot;
    /// The interrupt line and the console the UART writes to.
    type ConstructorArgs = (EventFdTrigger, ConsoleOut);
    type Error = SerialRestoreError;

    fn save(&self) -> SerialSnapshot {
        self.0.state().into()
    }

    /// A UART in the saved state; it raises its interrupt again if one was pending.
    fn restore((irq, out): (EventFdTrigger, ConsoleOut), state: &SerialSnapshot) -> Result<Self, SerialRestoreError> {
        state.check()?;
        Serial::from_state(&state.into(), irq, NoEvents, out)
            .map(SerialDevice)
            .map_err(|e| SerialRestoreError::State(format!("{e:?}")))
    }
}
