from megacrystal.cli import main

if __name__ == "__main__":  # also required by dist_checkpointing's spawned writer processes
    raise SystemExit(main())
