from analogjax.cli import console_main

console_main()
