//! Planning a migration: the cost model fitted to calibration runs and to
//! reports, calibration itself, and the pre-copy stop policy.
pub mod calibrate;
pub mod model;
pub mod policy;
