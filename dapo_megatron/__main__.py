from dapo_megatron.cli import main

raise SystemExit(main())
