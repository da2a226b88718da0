"""Safe file-system work shared by every command that reads or writes user files: paths read from files stay inside
their folder (:mod:`.paths`), one writer per output at a time (:mod:`.output_lock`), and outputs that never replace or
delete what a command reads (:mod:`.outputs`)."""
