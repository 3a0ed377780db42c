"""A course chapter on vision-language interpretability with the Shapes models (`notebooks/course/`).

`section1` … `section6` hold the reference solutions of each notebook's exercises, `tests` the
checkers a student calls (`tests.test_xxx(student_fn, model)`), which run the student's function
and the solution on fresh scenes and say what differs. `common` builds those fresh inputs and
compares results; `student` turns the solution notebooks into student versions.
"""
