//! End-to-end tests of the prescient binary under real KVM, and the test guest they boot.
