//! Emulated devices: legacy PIO devices now, virtio-mmio devices later.
