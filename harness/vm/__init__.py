"""One L0 QEMU process and one migration between two of them; nothing about scenarios."""
