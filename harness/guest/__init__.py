"""What runs inside L1: the kernel, the initramfs and guest programs (built, cached), SSH into L1."""
