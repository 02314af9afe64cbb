"""What the machine is: sysfs readings (board, temperature, throttling), detection of RAM, CPU
and storage, device profiles, and the measured memory bandwidth."""
